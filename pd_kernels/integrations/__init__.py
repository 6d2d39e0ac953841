"""Drop-in paths into other libraries: :mod:`.transformers` (attention + paged cache), :mod:`.dream`
(load a Dream checkpoint into the transformers Qwen2 classes), :mod:`.checkpoints` (load any checkpoint
directory pd_kernels decodes: model and tokenizer), :mod:`.tags` (the control tags from a tokenizer)."""
