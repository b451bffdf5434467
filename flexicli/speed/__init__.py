"""flexi bench: CPU prefill/decode ratios against the original model, and the GPU decode engine with its kernels."""
