from .config import TrainableTokensConfig
from .layer import TrainableTokensLayer
from .model import TrainableTokensModel

__all__ = ["TrainableTokensConfig", "TrainableTokensLayer", "TrainableTokensModel"]
