//! Payment gateways (in progress)
