//! The gate's routes on the admin port.
