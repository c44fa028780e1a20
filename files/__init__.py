"""What every command shares about files: user errors, checked readers of inputs, atomic publishing of folders, Hub resolution."""
