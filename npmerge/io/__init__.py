"""Reading and writing checkpoints: safetensors files, model directories, output."""
