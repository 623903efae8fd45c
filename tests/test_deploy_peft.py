"""`export peft` of adapters trained on a quantized base: the base travels with them as a
compressed-tensors directory, so AutoPeftModelForCausalLM.from_pretrained(DIR) gives our logits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import surgery
from tests.passes.test_adapters import tokens, train
from tests.passes.test_peft_export import export

pytest.importorskip("peft", reason="the PEFT round trip needs the peft package")
pytest.importorskip("compressed_tensors", reason="the quantized base is written in its format")


@pytest.mark.parametrize("quant", ["int8", "int4 using rtn(group=16, symmetric=false)"])
def test_adapter_on_quantized_base_loads_with_its_base(tmp_path, quant):
    from peft import AutoPeftModelForCausalLM
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config, tiny_tokenizer

    base = tmp_path / "base"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    res = surgery.apply(None, f'model base = "hf:{base}"\n'
                              f'quantize type(Linear) - modules("lm_head") to {quant}\n'
                              'adapt modules("**.q_proj", "**.v_proj") with lora(r=4)\n')
    model, ids = res.model, tokens(4)
    train(model, ids, lr=1e-2)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    cfg = export(model, tmp_path / "ad", {"base": f"hf:{base}"})
    qbase = (tmp_path / "ad" / "base").resolve()
    assert cfg["base_model_name_or_path"] == str(qbase)
    qcfg = json.loads((qbase / "config.json").read_text())
    assert qcfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (qbase / "tokenizer.json").exists() and (tmp_path / "ad" / "tokenizer.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "ad")).eval()
    with torch.no_grad():
        theirs = loaded(input_ids=ids).logits
    rel = float((theirs - ours).abs().max() / ours.abs().max())
    assert rel < 1e-5, rel
    # the float base would be wrong: the quantization matters at this size
    from peft import PeftModel

    with torch.no_grad():
        on_float = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base),
                                             str(tmp_path / "ad")).eval()
        wrong = on_float(input_ids=ids).logits
    assert float((wrong - ours).abs().max()) > 100 * float((theirs - ours).abs().max()) + 1e-6
