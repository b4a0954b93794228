"""ptq4dm.backends"""
