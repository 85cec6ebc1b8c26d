"""minift: fine-tuning methods for transformers, from scratch in plain PyTorch.

The public API, re-exported; each method is also importable as a module
(``from minift.methods import lora``) and reads top to bottom there. The training loop is
``minift.train.train`` (not re-exported here, so ``minift.train`` stays the module).
"""
from minift.adapters import load_adapter, save_adapter
from minift.advisor import MemoryEstimate, Recommendation, estimate_memory, recommend
from minift.data import (ClassificationData, DataError, batches, collate, load_tokenizer, read_classification,
                         read_records)
from minift.fetch import FetchError, cache_dir, fetch_minilm, fetch_sentiment
from minift.methods import adalora, freeze, full, lora, prefix, probe, prompt
from minift.methods.adalora import AdaLoRAConfig, SVDLinear
from minift.methods.adalora_alloc import RankAllocator
from minift.methods.common import count_trainable, summary
from minift.methods.freeze import FreezeConfig, GradualUnfreezer, bitfit, discriminative_param_groups
from minift.methods.lora import LoRAConfig, LoRALinear
from minift.methods.prefix import PrefixConfig, PrefixEncoder
from minift.methods.probe import ProbeResult, run_probe
from minift.methods.prompt import PromptConfig, SoftPrompt
from minift.metrics import accuracy, perplexity, precision_recall_f1, rouge_l, rouge_n
from minift.models.bert import Bert, BertClassifier, BertConfig
from minift.models.gpt import GPT, GPTConfig
from minift.forward import model_forward
from minift.train import TrainConfig, TrainResult

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
