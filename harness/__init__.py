"""mmpetl harness: backbones, data, tasks, training, pipeline stages and the CLI."""
