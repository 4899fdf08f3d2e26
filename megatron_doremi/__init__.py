"""megatron-doremi: data-mixture optimisation (DoReMi, RegMix) on a DeepSpeed ZeRO-3 stack."""

__version__ = "0.1.0"
