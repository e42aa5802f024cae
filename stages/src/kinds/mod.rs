//! One module per stage kind; `register_all` lists them.

use fgflow_engine::Registry;

mod clean;
mod command;
pub use command::stop_commands_on_interrupt;
mod ensemble;
mod evaluate;
mod import;
mod predict;
mod pretrain;
mod pseudo_label;
mod quickdraw;
mod redistribute;
mod report;
mod soup;
mod train;

pub(crate) fn register_all(r: &mut Registry) {
    r.register(command::Command);
    r.register(quickdraw::QuickDraw);
    r.register(import::ImportFolder);
    r.register(pretrain::Pretrain);
    r.register(train::Train);
    r.register(predict::Predict);
    r.register(evaluate::Evaluate);
    r.register(ensemble::Ensemble);
    r.register(pseudo_label::PseudoLabel);
    r.register(redistribute::Redistribute);
    r.register(report::Report);
    r.register(soup::Soup);
    r.register(clean::Clean);
}
