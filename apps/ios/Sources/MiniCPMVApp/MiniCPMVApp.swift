import SwiftUI

@main
struct MiniCPMVApp: App {
    @StateObject private var controller = ChatController()

    var body: some Scene {
        WindowGroup {
            ContentView()
                .environmentObject(controller)
        }
    }
}
