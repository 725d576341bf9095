"""The `gspo-engine` command line."""

import click

from gspo_engine import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gspo-engine")
def main() -> None:
    """GSPO reinforcement-learning fine-tuning of Qwen3 models."""
