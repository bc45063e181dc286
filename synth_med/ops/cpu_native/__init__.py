"""The UNet's CPU ops: C++ kernels (`src/`, built by `kernels` on first use) behind custom VJPs
(`layers`) that fall back to XLA's maths wherever a kernel does not apply."""
