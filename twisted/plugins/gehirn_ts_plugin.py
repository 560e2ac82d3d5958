from twisted.application.service import ServiceMaker

gehirnTs = ServiceMaker("gehirn-ts", "gehirn_ts.tap", "Mail and event delivery daemon", "gehirn-ts")
