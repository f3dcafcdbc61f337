"""Small shared builders for tests: tiny random models of several transformers families."""
import torch
import transformers


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=128, max_position_embeddings=64)
    if family == "bert":
        cfg = transformers.BertConfig(**common)
        cfg.architectures = ["BertModel"]
        return transformers.BertModel(cfg).eval()
    cls = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "gemma": "Gemma"}[family]
    cfg = getattr(transformers, f"{cls}Config")(num_key_value_heads=2, head_dim=16, **common)
    cfg.architectures = [f"{cls}ForCausalLM"]
    return getattr(transformers, f"{cls}ForCausalLM")(cfg).eval()


def masked_dense_copy(model, sparse_model):
    """A copy of ``model`` whose linears hold exactly the decompressed weights of ``sparse_model``."""
    import copy

    from sparse_runtime import SparseLinear

    dense = copy.deepcopy(model)
    for name, mod in sparse_model.named_modules():
        if isinstance(mod, SparseLinear):
            dense.get_submodule(name).weight.data = mod.dense_weight().clone()
    return dense
