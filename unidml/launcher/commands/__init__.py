"""launcher/commands"""
