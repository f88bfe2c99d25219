//! Quantized matrix products.
