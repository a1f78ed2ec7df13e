"""Loading weights trained by other libraries into lrnnx models.

Each module here maps one library's checkpoint layout onto lrnnx modules, exactly (the same
function, not an approximation), and is tested by building the other library's model with
random weights, saving it, loading it with lrnnx and comparing outputs.  Nothing here imports
the other library at ``import lrnnx`` time.

- :mod:`lrnnx.interop.mamba`: transformers' ``MambaForCausalLM`` directories (the public
  ``mamba-*-hf`` checkpoints) and mamba_ssm's ``MambaLMHeadModel`` layout -> an
  :class:`~lrnnx.architectures.LRNNLMHeadModel` (``load_mamba_checkpoint``; also what
  ``LRNNLMHeadModel.from_pretrained`` does for such a directory).
- :mod:`lrnnx.interop.recurrentgemma`: transformers' RecurrentGemma recurrent blocks ->
  :class:`~lrnnx.models.ltv.RGLRU` with Griffin's segment reset (``rglru_from_recurrentgemma``,
  ``load_recurrentgemma_recurrent_layers``).
- :mod:`lrnnx.interop.centaurus`: Brainchip's official Centaurus layers ->
  :class:`~lrnnx.models.lti.Centaurus` (``from_ssm_layer``, ``from_state_dict``).
"""
