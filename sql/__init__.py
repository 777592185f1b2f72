"""SQL kept as files (shipped in the wheel as retrieval_assets.sql); each file is frozen once a
revision installs it: a change is a new file and a new revision."""
