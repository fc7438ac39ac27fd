//! `ffai convert`.
use clap::Args;
use ffai::{Error, Result};

#[derive(Args)]
pub struct ConvertArgs {}

pub fn cmd_convert(_a: ConvertArgs) -> Result<()> {
    Err(Error::new("todo"))
}
