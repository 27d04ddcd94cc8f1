//! Stages (in progress)
