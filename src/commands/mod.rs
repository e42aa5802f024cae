//! One module per verb (or family of inspecting verbs).

pub mod compare;
pub mod explain;
pub mod gc;
pub mod graph;
pub mod inspect;
pub mod kinds;
pub mod report;
pub mod run;
pub mod status;
