"""Each method's adapter file layouts, one module per method: lora, adalora, prompt_learning
(prefix and prompt tuning). Each has a save and a load function per layout ("peft", "minift")
and a ``*_load_or_undo`` that leaves the model as it was when a load fails; ``minift.adapters``
chooses among them."""
