//! One module per stage kind; `register_all` lists them.

use fgflow_engine::Registry;

pub(crate) fn register_all(_r: &mut Registry) {
    // one line per kind, e.g. `r.register(command::Command);`
}
