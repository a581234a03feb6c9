//! Deterministic multi-peer harness for the pure core (see tests below).
