"""Drop-in paths into other libraries: :mod:`.transformers` (attention + paged cache), :mod:`.dream`
(load a Dream checkpoint into the transformers Qwen2 classes)."""
