"""Publish lt_zoo runs to the Hugging Face Hub: safetensors + timm config.json + a model card with results.

    python -m lt_zoo.hub push RUN_DIR --repo-id ORG/NAME [--private] [--dry-run] [--out DIR] [--fold-nbn]
    python -m lt_zoo.hub card RUN_DIR --repo-id ORG/NAME --out hub_cards/NAME.md [--fold-nbn]
    ... [--benchmark benchmarks/results/fmnist_lt.json [--benchmark-row ID]]   # card: results across seeds

Published checkpoints are listed in ``lt_zoo.models.pretrained_tags`` so that
``timm.create_model('resnet32_cbn.fmnist_lt', pretrained=True)`` finds them.
"""
from .card import benchmark_row, card_data_for, render_model_card
from .citations import METHOD_PAPERS, PAPERS, papers_for
from .folder import HUB_FILES, build_hub_folder, fold_nbn_for_export, plain_architecture, verify_export
from .publish import MissingTokenError, PushResult, push_run, resolve_token, validate_repo_id, write_card
from .run_record import RunRecord, read_run_dir
from .tag_entry import format_tag_entry, pretrained_tag_entry
