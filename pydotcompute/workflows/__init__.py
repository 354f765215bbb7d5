"""Durable workflows: ``@workflow`` code that calls ``@activity`` steps, ring kernels,
coordinator graphs, other workflows and ``@task`` items answered from outside, journaled
call by call so that after a crash it resumes by replay without repeating a committed call.

It sits beside the coordinator and shares its journal; the runtime reaches it through
``rt.start_workflow`` and friends.
"""

from __future__ import annotations

from pydotcompute.workflows.engine import WorkflowContext, WorkflowEngine, find_task
from pydotcompute.workflows.steps import (
    Activity,
    PendingTask,
    Task,
    Workflow,
    WorkflowStatus,
    activity,
    task,
    workflow,
)

__all__ = [
    "Activity",
    "PendingTask",
    "Task",
    "Workflow",
    "WorkflowContext",
    "WorkflowEngine",
    "WorkflowStatus",
    "activity",
    "find_task",
    "task",
    "workflow",
]
