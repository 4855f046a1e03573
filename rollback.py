#!/usr/bin/env python3
"""rollback.py ENV: back to a chosen point. Not built yet: it says so and exits 2."""

from safedeploy import cli
from safedeploy.errors import usage_error


def main():
    p = cli.parser("rollback.py", "Roll an env back to a point (not built yet).",
                   ["python3 rollback.py prod --list", "python3 rollback.py prod --to prod-before-deploy-20261124-130000"])
    p.add_argument("env", metavar="ENV")
    p.add_argument("--to", metavar="POINT")
    p.add_argument("--list", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--with-db", action="store_true")
    p.add_argument("--code-only", action="store_true")
    p.add_argument("--yes", action="store_true")
    args = p.parse_args()
    cli.load_config(args).env(args.env)
    raise usage_error("rollback.py is not built yet; roll back by hand: git -C PATH reset --hard TAG, "
                      "then systemctl --user restart UNIT")


if __name__ == "__main__":
    cli.run(main)
