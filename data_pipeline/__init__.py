"""EmoBench input pipeline: record validation, media decoding, chat templates, Grain batching."""
