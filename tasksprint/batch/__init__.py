"""disBatch compatibility: the task-file language, the task environment and the status file.

Pure code (no processes, files or clock): :mod:`tasksprint.batch.taskfile`
reads a task file into task records, :mod:`tasksprint.batch.env` gives the
``DISBATCH_*`` variables of a task, and :mod:`tasksprint.batch.statusfile`
writes and reads status lines and decides what a resumed run skips.
"""
