"""An example user package: models, a loss and a data loader that dtrain trains by import path."""
