"""`megacluster plan`: a digital twin of AI supercomputers (pure numpy; never imports torch).

    from megacluster.plan import load_scenario, predict
    p = predict({"model": {...}, "train": {...}, "parallel": {...}, "fleet": {...}})
    p.to_dict()["goodput"]
"""

from .predict import Prediction, predict
from .scenario import Scenario, ScenarioError, load_scenario

__all__ = ["Prediction", "Scenario", "ScenarioError", "load_scenario", "predict"]
