//! The scorers: each rates one replica between 0 (worst) and 1 (best), from
//! the replica's state and the request; the picker sums them by weight.
