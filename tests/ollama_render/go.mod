module snugtune/ollamarender

go 1.19
