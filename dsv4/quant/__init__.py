"""FP8 (e4m3) and FP4 (e2m1) formats of the released DeepSeek-V4 weights and of its
quantisation-aware forward pass: pack, unpack, dequantise. Depends on torch only."""
