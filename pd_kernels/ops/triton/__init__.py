"""Triton kernels. Imported lazily by the op modules so that ``import pd_kernels`` never needs Triton."""
