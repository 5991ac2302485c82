"""The typer apps every command module attaches to (`unmask`, `unmask eval`, `unmask bench`)."""

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="unmask: diffusion language models — train, decode fast, edit in place, serve.")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate models (ELBO, infill, HumanEval, speed vs quality).")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print figures (never asserted by tests).")
app.add_typer(eval_app, name="eval")
app.add_typer(bench_app, name="bench")
