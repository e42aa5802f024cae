//! Learning-rate schedule: linear warm-up from lr/warmup to lr over the warm-up steps,
//! then cosine decay to `min_lr` at the last step. Stepped per iteration, so short
//! runs on small data still get a smooth curve.

/// Learning rate at optimiser step `step` (0-based) of `total` steps.
pub fn lr_at(step: usize, total: usize, warmup: usize, lr: f64, min_lr: f64) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let t = ((step - warmup) as f64 / span as f64).min(1.0);
    min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
}

#[cfg(test)]
mod tests {
    use super::lr_at;

    #[test]
    fn warmup_then_cosine() {
        // 10 steps, 2 warm-up: 0.5, 1.0 then cosine from 1.0 down towards 0.1.
        assert!((lr_at(0, 10, 2, 1.0, 0.1) - 0.5).abs() < 1e-12);
        assert!((lr_at(1, 10, 2, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(2, 10, 2, 1.0, 0.1) - 1.0).abs() < 1e-12);
        // Half-way through the cosine part: (1.0 + 0.1) / 2.
        assert!((lr_at(6, 10, 2, 1.0, 0.1) - 0.55).abs() < 1e-12);
        assert!(lr_at(9, 10, 2, 1.0, 0.1) > 0.1);
        assert!((lr_at(10, 10, 2, 1.0, 0.1) - 0.1).abs() < 1e-12);
        // No warm-up.
        assert!((lr_at(0, 4, 0, 2.0, 0.0) - 2.0).abs() < 1e-12);
    }
}
