"""Command line of rerankflow: ``rerankflow serve`` and ``rerankflow stop``.

``python -m rerankflow serve --model-dir output/rerank/stage4_export/onnx`` runs the ranking
service in the foreground (Ctrl+C or SIGTERM stops it gracefully). Settings come, lowest
precedence first, from the schema's ``deploy`` defaults (``config/schema.yaml``), ``--config`` (the
workflow's config.yaml: its ``deploy`` section, and the ``reranker`` keys it sets), ``--settings``
(the JSON file the deploy rule writes) and the individual flags. ``max_length``, ``prompt_template``
and ``input_format`` not set anywhere are the export's record (``rerankflow_export.json``), else the
schema's ``reranker`` defaults.

``rerankflow stop --endpoint-file output/rerank/stage5_deploy/endpoint.json`` stops the server
or NIM container recorded there, and only that one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rerankflow.errors import InputError
from rerankflow.formatting import INPUT_FORMATS


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the ranking service in the foreground")
    p.add_argument("--model-dir", "--model", dest="model", help="ONNX model file or folder holding model.onnx (stage4_export/onnx)")
    p.add_argument("--tokenizer", help="tokenizer.json or its folder (default: found beside the model)")
    p.add_argument("--config", help="workflow config YAML; its deploy and reranker sections are used")
    p.add_argument("--settings", help="JSON settings file written by the deploy rule")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--model-name", help="model id reported by /v1/models")
    p.add_argument("--max-length", type=int, help="reranker.max_length (must equal training's)")
    p.add_argument("--prompt-template", help="reranker.prompt_template (must equal training's)")
    p.add_argument("--input-format", choices=list(INPUT_FORMATS),
                   help="reranker.input_format: template (one text) or pair (sentence pair); must equal the export's")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--intra-op-threads", type=int)
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-batch-tokens", type=int,
                   help="deploy.max_batch_tokens: padded tokens per batch (pairs x longest pair); default: no token budget")
    p.add_argument("--max-wait-ms", type=float)
    p.add_argument("--batch-workers", type=int, help="batches run at once (each in its own thread)")
    p.add_argument("--dynamic-batching", dest="dynamic_batching", action="store_true", default=None)
    p.add_argument("--no-dynamic-batching", dest="dynamic_batching", action="store_false")
    p.add_argument("--max-passages", type=int)
    p.add_argument("--max-body-bytes", type=int)
    p.add_argument("--max-text-chars", type=int)
    p.add_argument("--default-truncate", choices=["NONE", "END"])
    p.add_argument("--auth-token-env", help="name of the environment variable holding the bearer token")
    p.add_argument("--fusion-weight", type=float,
                   help="deploy.fusion_weight: reranker weight when requests carry first_stage_score (default: the export record's)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def _stop_parser(sub) -> None:
    p = sub.add_parser("stop", help="stop the service recorded in an endpoint.json")
    p.add_argument("--endpoint-file", required=True)
    p.add_argument("--out", help="also write the stop record (JSON) here")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds to wait after SIGTERM before SIGKILL")


def serve_settings_from_args(args) -> "ServeSettings":  # noqa: F821
    """Merge the schema's defaults, --config, --settings and flags into :class:`ServeSettings`."""
    from rerankflow.config import load_config
    from rerankflow.serve.settings import ServeSettings, load_settings_file

    user: dict = {}
    if args.config:
        import yaml

        user = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
    cfg = load_config(user)
    # deploy.model names the export folder to serve (onnx | int8), not a path; the NIM and rule keys are not server settings
    merged = {k: v for k, v in cfg["deploy"].items() if k not in ("model", "backend", "nim", "ready_timeout_s", "smoke_passages")}
    # the text settings belong to the export's record: only the ones the user's config sets are passed (and checked)
    merged.update({k: v for k, v in (user.get("reranker") or {}).items() if k in ("max_length", "prompt_template", "input_format")})
    model = None
    if args.config:
        model = str(Path(cfg["output_dir"]) / "stage4_export" / ("onnx_int8" if cfg["deploy"]["model"] == "int8" else "onnx"))
    if args.settings:
        merged.update(load_settings_file(args.settings))
    flags = {
        "model": args.model, "tokenizer": args.tokenizer, "host": args.host, "port": args.port,
        "model_name": args.model_name, "max_length": args.max_length, "prompt_template": args.prompt_template,
        "input_format": args.input_format,
        "device": args.device, "intra_op_threads": args.intra_op_threads, "max_batch_size": args.max_batch_size,
        "max_batch_tokens": args.max_batch_tokens,
        "max_wait_ms": args.max_wait_ms, "batch_workers": args.batch_workers, "dynamic_batching": args.dynamic_batching, "max_passages": args.max_passages,
        "max_body_bytes": args.max_body_bytes, "max_text_chars": args.max_text_chars,
        "default_truncate": args.default_truncate, "auth_token_env": args.auth_token_env, "log_level": args.log_level,
        "fusion_weight": args.fusion_weight,
    }
    merged.update({k: v for k, v in flags.items() if v is not None})
    merged.setdefault("model", model)
    if not merged.get("model"):
        raise InputError("no model given: pass --model-dir (e.g. output/rerank/stage4_export/onnx) or --config")
    return ServeSettings.from_dict(merged).validate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rerankflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _stop_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            from rerankflow.serve.server import run_server

            run_server(serve_settings_from_args(args))
            return 0
        if args.command == "stop":
            import json

            from rerankflow.deploy.service import stop

            record = stop(args.endpoint_file, out_file=args.out, timeout_s=args.timeout)
            print(json.dumps(record, indent=2))
            return 0
    except ValueError as exc:  # InputError, and config errors naming the key
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl+C: the server has shut down gracefully (or had not started yet)
        print(f"rerankflow {args.command}: interrupted (SIGINT), stopped", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
