"""The research tools beside the service: training (research.train), sampling to files (research.generate),
evaluation (research.evaluate, research.evaluation) and the dataset loader (research.data).

They use the serving package's models, samplers and guidance (app.models, app.sampling, app.guidance); the
service never imports them, and the Docker image does not ship them.
"""
