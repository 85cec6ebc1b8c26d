"""minift: fine-tuning methods for transformers, from scratch in plain PyTorch.

The public API, re-exported (each name is imported on first use); each method is also importable as a module
(``from minift.methods import lora``) and reads top to bottom there. The training loop is
``minift.training.loop.train`` (not re-exported here, so ``minift.training.loop`` stays the module).
"""
_EXPORTS = {  # public name -> the module that defines it
    **dict.fromkeys(("load_adapter", "save_adapter"), "minift.adapters"),
    **dict.fromkeys(("MemoryEstimate", "Recommendation", "estimate_memory", "recommend"), "minift.studies.advisor"),
    **dict.fromkeys(("ClassificationData", "DataError", "batches", "collate", "load_tokenizer",
                     "read_classification", "read_records"), "minift.training.data"),
    **dict.fromkeys(("FetchError", "cache_dir", "fetch_minilm", "fetch_sentiment"), "minift.training.fetch"),
    **dict.fromkeys(("AdaLoRAConfig", "SVDLinear"), "minift.methods.adalora"),
    "RankAllocator": "minift.methods.adalora_alloc",
    **dict.fromkeys(("count_trainable", "summary"), "minift.methods.common"),
    **dict.fromkeys(("FreezeConfig", "GradualUnfreezer", "bitfit", "discriminative_param_groups"),
                    "minift.methods.freeze"),
    **dict.fromkeys(("LoRAConfig", "LoRALinear"), "minift.methods.lora"),
    **dict.fromkeys(("PrefixConfig", "PrefixEncoder"), "minift.methods.prefix"),
    **dict.fromkeys(("ProbeResult", "run_probe"), "minift.methods.probe"),
    **dict.fromkeys(("PromptConfig", "SoftPrompt"), "minift.methods.prompt"),
    **dict.fromkeys(("accuracy", "perplexity", "precision_recall_f1", "rouge_l", "rouge_n"), "minift.metrics"),
    **dict.fromkeys(("Bert", "BertClassifier", "BertConfig"), "minift.models.bert"),
    **dict.fromkeys(("GPT", "GPTConfig"), "minift.models.gpt"),
    "model_forward": "minift.training.forward",
    "TrainConfig": "minift.training.config", "TrainResult": "minift.training.loop",
}
_METHOD_MODULES = ("adalora", "freeze", "full", "lora", "prefix", "probe", "prompt")  # minift.lora etc.


def __getattr__(name: str):
    """Import a public name on first use (PEP 562), so `import minift` and the CLI start without
    loading torch until a command needs it."""
    import importlib
    if name in _METHOD_MODULES:
        value = importlib.import_module(f"minift.methods.{name}")
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'minift' has no attribute {name!r}")
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "GPT", "GPTConfig", "Bert", "BertClassifier", "BertConfig",
    "full", "lora", "adalora", "prefix", "prompt", "freeze", "probe",
    "LoRAConfig", "LoRALinear", "AdaLoRAConfig", "SVDLinear", "RankAllocator", "PrefixConfig",
    "PrefixEncoder", "PromptConfig", "SoftPrompt", "FreezeConfig", "GradualUnfreezer", "bitfit",
    "discriminative_param_groups", "ProbeResult", "run_probe", "count_trainable", "summary",
    "save_adapter", "load_adapter", "TrainConfig", "TrainResult", "model_forward",
    "DataError", "ClassificationData", "read_records", "read_classification", "load_tokenizer", "collate",
    "batches", "FetchError", "cache_dir", "fetch_minilm", "fetch_sentiment",
    "accuracy", "precision_recall_f1", "rouge_n", "rouge_l", "perplexity",
    "estimate_memory", "MemoryEstimate", "recommend", "Recommendation",
]
