"""The runbook: deploy, rollback and conversion as lists of named steps (safedeploy.runner runs them).

Each operation is one list, read by the real run, the dry run (--dry-run, --dry-run --json, the
rollback's plan), the journal, the fault matrix and the recovery of a killed run. The three share
one bring-up (runbook.bringup: restart or hand over, health, watch, revision). And there is one
"roll back and report" path, roll_back() (runbook.rollback): a deploy whose step after the switch
fails goes through it to its own before-deploy point, so does rollback.py, so does the recovery of
a deploy killed after its switch.

- runbook.bringup     the shared bring-up steps, the Run every operation's context extends, the probe
- runbook.deployment  DEPLOY, DeployRun, deploy(), deploy_steps() (the dry run), after_deploy()
- runbook.rollback    ROLLBACK, RollbackRun, rollback_run(), roll_back(), rollback_steps()
- runbook.conversion  CONVERSION, ConversionRun, convert_env()

This package names what the scripts, recovery, rehearsal, the tests and the fault matrix use, and where a
killed operation had changed nothing live (before_change). What a run says goes to the Output it carries
(safedeploy.output), made by the script: nothing here imports cli.
"""

from ..journals import Op
from .bringup import QUICK_STOP, Run, bring_up_steps, start_probe, stop_probe
from .conversion import CONVERSION, CONVERSION_BEFORE, ConversionRun, conversion_operation, convert_env
from .deployment import (DEPLOY, DEPLOY_BEFORE, DeployRun, after_deploy, deploy, deploy_operation, deploy_run,
                         deploy_steps)
from .rollback import (ROLLBACK, ROLLBACK_BEFORE, RollbackRun, mark_bad, release_for, roll_back, rollback_operation,
                       rollback_run, rollback_steps)

__all__ = ["CONVERSION", "CONVERSION_BEFORE", "DEPLOY", "DEPLOY_BEFORE", "QUICK_STOP", "ROLLBACK", "ROLLBACK_BEFORE",
           "ConversionRun", "DeployRun", "RollbackRun", "Run", "after_deploy", "before_change", "bring_up_steps",
           "conversion_operation", "convert_env", "deploy", "deploy_operation", "deploy_run", "deploy_steps",
           "mark_bad", "release_for", "roll_back", "rollback_operation", "rollback_run", "rollback_steps",
           "start_probe", "stop_probe"]


def before_change() -> dict[Op, set[str]]:
    """{op: names of the steps of its BEFORE phase}: where a killed operation had changed nothing live."""
    return {Op.DEPLOY: DEPLOY_BEFORE, Op.ROLLBACK: ROLLBACK_BEFORE, Op.CONVERT: CONVERSION_BEFORE}
