"""lm-pipeline: one pipeline, three runners (DVC, Airflow, Kubeflow) to retrain, ship and watch a LM.

Each stage is a module here with a pure core and ``run(params)``; :mod:`pipeline_tasks.cli` is the
single entry point. This package never imports airflow, and importing it imports nothing heavy.
"""

__version__ = "0.1.0"
