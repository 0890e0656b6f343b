def app(): print("ok")
