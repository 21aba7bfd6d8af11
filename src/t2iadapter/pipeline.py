"""The old import path: `from t2iadapter.pipeline import AdapterPipeline` (now in `t2iadapter.generation`)."""
from t2iadapter.generation.conditions import prepare_condition
from t2iadapter.generation.pipeline import AdapterPipeline, GenerationResult, task_of
from t2iadapter.generation.request import AdapterUse, GenerationRequest, Window
from t2iadapter.generation.schedulers import make_scheduler, scheduler_names

__all__ = ["AdapterPipeline", "AdapterUse", "GenerationRequest", "GenerationResult", "Window", "make_scheduler",
           "prepare_condition", "scheduler_names", "task_of"]
