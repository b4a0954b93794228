"""ptq4dm.ir"""
