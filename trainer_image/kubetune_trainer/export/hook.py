"""GGUF + Modelfile after the regular export (kubetune_trainer.worker, rank 0). Never raises: a family the
converter does not support, or any other failure, is reported in the summary's `export.error` while the adapter,
merged weights and metrics stay exported and the run succeeds."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_trainer.plan import Plan

log = logging.getLogger("kubetune_trainer.export")
GGUF_DIR = "gguf"


@dataclass
class ExportOutcome:
    """The summary's `export` block and the artifacts written."""

    summary: dict[str, Any]
    artifacts: dict[str, str] = field(default_factory=dict)


def gguf_name(outtype: str) -> str:
    """File name of the GGUF for a tensor type."""
    return f"model-{outtype}.gguf"


def _full_weights(recipe: Any, final: Path) -> tuple[Path, Path | None]:
    """(directory with full weights + tokenizer, temporary directory to remove or None)."""
    from kubetune_trainer.recipe import merge_adapter

    plan: Plan = recipe.plan
    if plan.method == "full":
        return final / "model", None
    if plan.output.merge_adapter and (final / "merged" / "config.json").is_file():
        return final / "merged", None
    tmp = recipe.env.work_dir / "export-merged"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    merge_adapter(str(recipe.model_dir), str(final / "adapter"), str(tmp), plan, recipe.precision, recipe.device)
    recipe.tokenizer.save_pretrained(str(tmp))
    return tmp, tmp


def after_training(recipe: Any) -> ExportOutcome:
    """Write final/gguf/model-<type>.gguf and final/gguf/Modelfile for `recipe` (after its export)."""
    from kubetune_trainer import storage
    from kubetune_trainer.export.gguf_file import gguf_architecture, write_gguf
    from kubetune_trainer.export.modelfile import ModelfileSpec, TemplateError, ollama_template, render_modelfile
    from kubetune_trainer.storage import join_uri

    plan: Plan = recipe.plan
    export = plan.output.export
    assert export is not None
    final = recipe.output_dir / "final"
    recipe._set_phase("exporting gguf")
    temp = None
    try:
        model_type = json.loads((Path(recipe.model_dir) / "config.json").read_text()).get("model_type", "")
        gguf_architecture(model_type)  # refuse an unsupported family before merging anything
        weights, temp = _full_weights(recipe, final)
        out_dir = final / GGUF_DIR
        if out_dir.exists():
            shutil.rmtree(out_dir)
        name = gguf_name(export.gguf)
        result = write_gguf(weights, out_dir / name, export.gguf, name=plan.job.name or weights.name)
        arts = {"gguf": join_uri(plan.output.uri, "final", GGUF_DIR, name)}
        summary: dict[str, Any] = {"architecture": result.architecture, "type": export.gguf, "tensors": result.tensors}
        if export.modelfile:
            try:
                template = ollama_template(recipe.tokenizer)
            except TemplateError as exc:
                log.warning("Modelfile without TEMPLATE (Ollama uses the GGUF's own): %s", exc)
                template = ""
            eos = getattr(recipe.tokenizer, "eos_token", None)
            text = render_modelfile(ModelfileSpec(
                gguf_file=name, template=template, system=export.system, temperature=export.temperature,
                top_p=export.top_p, num_ctx=export.num_ctx or plan.training.max_seq_length,
                stop=[eos] if eos else []))
            (out_dir / "Modelfile").write_text(text)
            arts["modelfile"] = join_uri(plan.output.uri, "final", GGUF_DIR, "Modelfile")
        storage.upload_dir(recipe.output_dir, plan.output.uri)
        log.info("GGUF export: %s (%s, %d tensors)", arts["gguf"], result.architecture, result.tensors)
        return ExportOutcome(summary=summary, artifacts=arts)
    except Exception as exc:  # noqa: BLE001 - the export fails alone; adapter/merged/metrics are already out
        log.exception("GGUF export failed; the adapter and merged weights are kept")
        return ExportOutcome(summary={"error": f"{type(exc).__name__}: {exc}"[:600]})
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
        recipe._set_phase("done")
