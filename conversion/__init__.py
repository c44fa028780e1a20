"""Checkpoint in, checkpoint out: conversion and layouts, upcycling, ONNX export, the Hub release builder."""
