//! Reading the committed Quick, Draw! drawings (`data/quickdraw/`): a grayscale PNG
//! grid with one band of tiles per class, and `classes.txt` naming the bands. The
//! layout (tile side, drawings per class) is derived from the files, so a regenerated
//! grid with more drawings needs no code change.

use std::fs;
use std::path::Path;

use fgflow_engine::StageError;

pub const GRID_FILE: &str = "quickdraw.png";
pub const CLASSES_FILE: &str = "classes.txt";

/// Every drawing of every class, class-major.
#[derive(Debug, Clone)]
pub struct Drawings {
    pub classes: Vec<String>,
    /// Tiles are `side x side`, one channel.
    pub side: usize,
    pub per_class: usize,
    /// `classes.len() * per_class * side * side` bytes: class, drawing, row, column.
    pub pixels: Vec<u8>,
}

impl Drawings {
    pub fn drawing(&self, class: usize, k: usize) -> &[u8] {
        let len = self.side * self.side;
        let start = (class * self.per_class + k) * len;
        &self.pixels[start..start + len]
    }

    /// Reads `quickdraw.png` and `classes.txt` from `dir`.
    pub fn load(dir: &Path) -> Result<Drawings, StageError> {
        let names_path = dir.join(CLASSES_FILE);
        let text = fs::read_to_string(&names_path).map_err(|e| StageError::io(format!("reading {}", names_path.display()), e))?;
        let classes: Vec<String> = text.lines().map(|l| l.trim_end_matches('\r').to_string()).filter(|l| !l.is_empty()).collect();
        if classes.is_empty() {
            return Err(StageError::failed(format!("{}: no class names", names_path.display())));
        }

        let grid_path = dir.join(GRID_FILE);
        let bytes = fs::read(&grid_path).map_err(|e| StageError::io(format!("reading {}", grid_path.display()), e))?;
        let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
            .map_err(|e| StageError::failed(format!("{}: not a readable PNG: {e}", grid_path.display())))?;
        let image::DynamicImage::ImageLuma8(grid) = img else {
            return Err(StageError::failed(format!("{}: expected an 8-bit grayscale PNG", grid_path.display())));
        };
        let (width, height) = (grid.width() as usize, grid.height() as usize);
        let side = height / classes.len();
        if side == 0 || side * classes.len() != height || width % side != 0 {
            return Err(StageError::failed(format!(
                "{}: a {width}x{height} grid does not hold square tiles in {} class bands ({})",
                grid_path.display(),
                classes.len(),
                names_path.display()
            )));
        }
        let per_class = width / side;
        let raw = grid.into_raw();
        // Rearrange the grid rows into contiguous tiles: a benchmark image is then one slice.
        let mut pixels = vec![0u8; raw.len()];
        let tile = side * side;
        for c in 0..classes.len() {
            for y in 0..side {
                let row = &raw[(c * side + y) * width..(c * side + y + 1) * width];
                for k in 0..per_class {
                    let dst = (c * per_class + k) * tile + y * side;
                    pixels[dst..dst + side].copy_from_slice(&row[k * side..(k + 1) * side]);
                }
            }
        }
        Ok(Drawings { classes, side, per_class, pixels })
    }
}
