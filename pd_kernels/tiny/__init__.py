"""The tiny planned-diffusion model shipped with pd_kernels: its task, tokenizer, training and evaluation."""
