#!/bin/sh
echo "greetings, ${1:-stranger}"
